"""Documents of the local lm-evaluation-harness tasks (`make lm-eval`), built from the repo's data files."""

from __future__ import annotations

from typing import Any


def process_ab(dataset: Any) -> Any:
    """CAA-format A/B questions: the question, choices " (A)"/" (B)", the behaviour-matching letter's index."""
    def to_doc(doc: dict) -> dict:
        return {"query": f"{doc['question']}\n\nAnswer:", "choices": [" (A)", " (B)"],
                "label": 0 if doc["answer_matching_behavior"].strip() == "(A)" else 1}
    return dataset.map(to_doc, remove_columns=dataset.column_names)


def process_sentiment(dataset: Any) -> Any:
    """Each sentiment pair as two labelled replies: is the reply positive (0) or negative (1)?"""
    def to_docs(batch: dict) -> dict:
        queries, labels = [], []
        for prompt, positive, negative in zip(batch["prompt"], batch["positive"], batch["negative"], strict=True):
            for reply, label in ((positive, 0), (negative, 1)):
                queries.append(f"Question: {prompt}\nReply: {reply}\nIs the reply positive or negative?\nAnswer:")
                labels.append(label)
        return {"query": queries, "choices": [[" positive", " negative"]] * len(queries), "label": labels}
    return dataset.map(to_docs, batched=True, remove_columns=dataset.column_names)
