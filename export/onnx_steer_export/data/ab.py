"""A/B behaviour questions in the format of CAA's behaviour datasets, and the one set this repo ships.

A question file is JSONL, one object per line:
  {"question": "...\\n\\nChoices:\\n (A) ...\\n (B) ...",
   "answer_matching_behavior": "(A)", "answer_not_matching_behavior": "(B)"}
(the answers may also be written " (A)", "A", or as a one-item list, as some CAA files do).

The shipped set is **optimism**: a short everyday situation, asked about in one of six frames, with a
hopeful reaction and a gloomy one as the two choices; the hopeful one matches the behaviour. It is
written here, not downloaded: 100 situations (each with its own two reactions) and 6 question frames.
The split is by situation and by frame together: 60 situations in 3 frames are the train split
(180 questions), the other 40 situations in the other 3 frames the test split (120 questions), so no
test question shares a situation, a reaction or a frame's wording with a train question. Within
each split the matching letter is A for exactly half of the questions (seeded).

The pairs file for `train-vector` follows CAA's recipe: positive = the question (as the chat user turn)
followed by the matching letter `(A` or `(B`, negative = the same question followed by the other
letter; the vector trainer reads each side's last token, which is the letter.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from .datasets import numbered_records, write_if_changed

LETTERS = ("A", "B")
BEHAVIOUR = "optimism"
SPLIT_SEED = 20260419
TRAIN_SITUATIONS = 60

# (situation, hopeful reaction, gloomy reaction). Every situation stands alone as a sentence.
SITUATIONS: tuple[tuple[str, str, str], ...] = (
    ("You failed your driving test this morning.",
     "That was a setback, but with more practice I will pass next time.",
     "I will probably never pass, I am just hopeless at driving."),
    ("Your job application was turned down.",
     "Another opening will come along, and I will be better prepared for it.",
     "Nobody is ever going to hire me, so why keep trying."),
    ("You moved to a new city where you know nobody.",
     "I will meet new people soon, and this is a fresh start.",
     "I will be lonely here for years and never fit in."),
    ("Your small business had a slow first month.",
     "First months are often slow, and sales can grow as word spreads.",
     "This business is doomed, and I will lose everything."),
    ("You sprained your ankle a week before a hiking trip.",
     "It should heal in time, and if not there will be other trips.",
     "The trip is ruined, and things like this always happen to me."),
    ("Your team lost the first match of the season.",
     "There is a whole season left, and we can learn from this game.",
     "We are going to lose every single match this year."),
    ("You got a lower grade than you hoped for on your essay.",
     "The feedback shows me exactly how to improve the next one.",
     "I am simply not smart enough for this course."),
    ("Your flight was delayed by four hours.",
     "I can read and relax, and I will still get there today.",
     "The whole holiday is off to a terrible start and will only get worse."),
    ("You are starting to learn the piano as an adult.",
     "It will take time, but I can make steady progress and enjoy it.",
     "I started far too late, and I will never play well."),
    ("Your best friend is moving abroad.",
     "We can stay close with calls and visits, and I may see a new country.",
     "Our friendship will fade away once she is gone."),
    ("You received critical comments from your manager.",
     "This is useful advice that can help me grow at work.",
     "My manager thinks I am useless, and I will be fired soon."),
    ("Snails ate the tomatoes in your garden.",
     "Next year I will protect them better, and the beans are still fine.",
     "Gardening is pointless, something always ruins it."),
    ("You have a big presentation tomorrow.",
     "I have prepared well, and it could go really nicely.",
     "I will freeze up and embarrass myself in front of everyone."),
    ("An unexpected car repair ate into your savings.",
     "I can rebuild my savings step by step over the next months.",
     "I will never get ahead with money, no matter what I do."),
    ("You were not picked for the school play.",
     "I can try again next term, and I could help backstage meanwhile.",
     "I will never get a part, the teachers just do not like me."),
    ("Your new recipe came out burnt.",
     "Now I know to lower the heat, and the next attempt will be better.",
     "I am a terrible cook and should give up trying new dishes."),
    ("You are recovering from a bad cold.",
     "I am getting a little better each day and will be back to normal soon.",
     "This cold will drag on for weeks and probably get worse."),
    ("Your neighbourhood is getting a new park next year.",
     "It will be a lovely place for walks and for meeting neighbours.",
     "It will probably be noisy, dirty and full of litter."),
    ("You lost your wallet on the bus.",
     "Someone may hand it in, and cards can be replaced quickly.",
     "It is gone forever, and someone is already emptying my account."),
    ("Your first date in years went only so-so.",
     "It was good practice, and the next one might really click.",
     "I am going to be alone forever."),
    ("You start a new job on Monday.",
     "It is a chance to learn new things and meet great colleagues.",
     "I will probably hate it and mess everything up in the first week."),
    ("Your exam results come out next week.",
     "I worked hard, so there is a good chance they will be fine.",
     "I am sure I failed, and the results will be awful."),
    ("Your town is having its coldest winter in decades.",
     "Spring will come, and the cold days make a warm drink all the nicer.",
     "It will only get colder and more miserable from here."),
    ("You missed the last train home.",
     "I can take a taxi or the first morning train, and it makes a funny story.",
     "This night is a disaster and nothing ever goes my way."),
    ("Your favourite cafe closed down.",
     "A new place will open, and I might discover a new favourite.",
     "All the good places are disappearing, and the town is going downhill."),
    ("You have been asked to lead a project for the first time.",
     "This is a great chance to show what I can do.",
     "I will be overwhelmed, and the project will fail because of me."),
    ("Your phone screen cracked.",
     "It still works, and a repair is not too expensive.",
     "This is the start of a terrible week, I can feel it."),
    ("You are running your first marathon next month.",
     "My training is going well, and I will enjoy crossing the finish line.",
     "I will hit the wall halfway and never finish."),
    ("Your parents are visiting for the holidays.",
     "It will be lovely to catch up and share good meals together.",
     "We are going to argue the whole time, as always."),
    ("Your apartment is small and a bit dark.",
     "With some lamps and plants it can feel cosy and bright.",
     "It will always feel cramped and gloomy, whatever I do."),
    ("You forgot a close friend's birthday.",
     "I can apologise and take her out for lunch, and she will understand.",
     "She will never forgive me, and the friendship is over."),
    ("The software your team released has several bugs.",
     "We can fix them in the next update, and users will see the improvements.",
     "The product is a failure, and the customers will all leave."),
    ("You are learning a new language and still make many mistakes.",
     "Mistakes mean I am practising, and I improve every week.",
     "I will never speak it properly, so it is a waste of time."),
    ("Your bus route is changing next month.",
     "The new route might even be quicker, and I can try it out.",
     "The change will turn my commute into a nightmare."),
    ("You did not win the raffle at the fair.",
     "It was for a good cause, and there will be another raffle.",
     "I never win anything, luck is always against me."),
    ("Your company announced a reorganisation.",
     "It could bring new opportunities and a better way of working.",
     "I am sure my job will be cut and things will fall apart."),
    ("You have a dentist appointment tomorrow.",
     "It will probably be quick, and my teeth will feel great afterwards.",
     "It will hurt, and they will find something terrible."),
    ("Your little brother is starting university.",
     "He will grow a lot and have wonderful experiences there.",
     "He will struggle, fail his courses and drop out."),
    ("You are trying to get fit again after a long break.",
     "Every workout counts, and I will feel stronger soon.",
     "I have let myself go too far, it is too late now."),
    ("Your houseplant has yellow leaves.",
     "With a bit less water and more light it can recover.",
     "It is dying, I kill every plant I touch."),
    ("The forecast says clouds for your beach day.",
     "Clouds can clear, and a cool day at the beach is still fun.",
     "The day is ruined, it will surely pour down."),
    ("Your story for the writing competition was not shortlisted.",
     "Entering was good experience, and I can polish it for the next contest.",
     "My writing is worthless, and I should stop entering."),
    ("You have to share an office with a new colleague.",
     "I might make a new friend and learn from them.",
     "They will be annoying, and I will never get any work done."),
    ("Your laptop crashed and you lost an hour of work.",
     "I remember most of it, and I can redo it faster now.",
     "Everything is against me today, and the work will never be done."),
    ("You got a parking ticket.",
     "It is a small cost, and I will check the signs more carefully.",
     "The city is out to get me, and it will keep happening."),
    ("Your concert tickets are for the back row.",
     "The atmosphere will be great, and I can still hear the music.",
     "I will not see a thing, and the evening will be a letdown."),
    ("You are waiting to hear back from a university.",
     "I sent a strong application, and there is a real chance I get in.",
     "They will reject me, just like everyone else does."),
    ("Your sister has just had her first baby.",
     "It is a joyful time, and I cannot wait to meet the little one.",
     "Everything will change, and we will hardly see each other now."),
    ("Someone gave you an old car with high mileage.",
     "If I look after it, it can run well for years.",
     "It will break down constantly and cost me a fortune."),
    ("The factory in your hometown is closing.",
     "New businesses can move in, and people can retrain for other work.",
     "The town will empty out and never recover."),
    ("You are planting a young tree in your yard.",
     "In a few years it will give shade and beauty.",
     "It will probably die in the first dry summer."),
    ("Your daughter is nervous about her first day at school.",
     "She will make friends quickly and love her teacher.",
     "She will be miserable there and hate school."),
    ("You are taking a cooking class for the first time.",
     "I will learn new dishes and have fun with the group.",
     "I will be the worst one there and look foolish."),
    ("Your rent is going up next year.",
     "I can adjust my budget or look for a better deal.",
     "I will be priced out and end up with nowhere to live."),
    ("You tried to fix a leaky tap yourself and it still drips.",
     "I am close, and one more try with a video will sort it out.",
     "I am useless with tools and always make things worse."),
    ("Your favourite football player retired.",
     "There will be new young stars to cheer for.",
     "The team will never be as good without him."),
    ("You have a long train journey ahead of you.",
     "It is a good chance to read, rest and watch the view.",
     "It will be endless and awful, and I will arrive exhausted."),
    ("Your proposal at the meeting was not accepted.",
     "I can refine it with their feedback and bring it back.",
     "My ideas are never good enough for anyone."),
    ("You are going on a trip with people you barely know.",
     "It is a great chance to make some new friends.",
     "It will be awkward, and I will spend the whole trip alone."),
    ("Your country is facing a difficult economic year.",
     "Hard years pass, and people often find new ways to thrive.",
     "Things will keep getting worse for a very long time."),
    ("You woke up late and missed your usual morning run.",
     "I can go for a walk at lunch instead, the day is still young.",
     "The whole day is wasted now."),
    ("Your bread dough did not rise.",
     "The yeast was probably old, and next time it will rise nicely.",
     "Baking is just not for me, it never works."),
    ("You are meeting your partner's family for the first time.",
     "They will likely be warm, and we will get along.",
     "They will dislike me from the very first minute."),
    ("Your bike was stolen from outside the station.",
     "Insurance may help, and I can get a better lock for the next one.",
     "Nothing is safe anywhere anymore, people are awful."),
    ("You scored only two points in your first basketball game.",
     "It was my first game, and I will improve with practice.",
     "I am hopeless at sports, and I should quit."),
    ("Your holiday photos came out blurry.",
     "The memories are what matter, and I can learn to use the camera better.",
     "The trip might as well not have happened."),
    ("You are starting therapy to deal with stress.",
     "Talking to someone can really help, and I might feel better soon.",
     "Nothing will help, I will feel this way forever."),
    ("Your online shop got its first bad review.",
     "One review is not the whole story, and I can learn from it.",
     "This review will ruin the reputation of my shop forever."),
    ("You have to retake a course next semester.",
     "I will understand it much better the second time around.",
     "I will fail it again, I am just not capable."),
    ("An old friend has not replied to your message.",
     "She is probably busy and will write back soon.",
     "She must not care about me anymore."),
    ("You are about to adopt a rescue dog.",
     "We will have years of walks and companionship together.",
     "The dog will be trouble and I will regret it."),
    ("Your car failed its yearly inspection.",
     "The fixes are probably simple, and it will pass after the repair.",
     "This car is a money pit and it will only get worse."),
    ("You got lost while exploring a new city.",
     "Getting lost led me to a lovely street I would have missed.",
     "This city is confusing and unsafe, I just want to go home."),
    ("Your research paper was accepted with major revisions.",
     "It was accepted, and the revisions will make it stronger.",
     "The reviewers hate it, and it will be rejected in the end."),
    ("Your team is behind schedule on a deadline.",
     "If we focus, we can still finish close to on time.",
     "We will miss it badly, and it will be a disaster."),
    ("You have a job interview over a video call.",
     "I can prepare in a quiet room and show my best side.",
     "The connection will fail and I will make a fool of myself."),
    ("Your grandmother is learning to use a smartphone.",
     "She will get the hang of it and enjoy video calls with us.",
     "She will never figure it out and will just get frustrated."),
    ("Your favourite television show was cancelled.",
     "There are other great shows to discover, and the story had a good run.",
     "Nothing good is ever made anymore."),
    ("You spilled coffee on your shirt before work.",
     "It is a small thing, I can wear my jacket and laugh about it.",
     "Today is going to be a complete disaster."),
    ("Your school is introducing a new timetable.",
     "The new schedule might give me more free time in the afternoons.",
     "It will be chaos, and everything will be harder."),
    ("You are saving up to buy a house.",
     "With steady saving I will reach my goal in a few years.",
     "House prices will keep rising and I will never afford one."),
    ("Your knee hurts after a long walk.",
     "A few days of rest and it will feel fine again.",
     "This is the start of a problem that will never go away."),
    ("You signed up for a charity run and have barely trained.",
     "I can take it easy, walk some parts and still enjoy the day.",
     "I will collapse halfway and everyone will laugh at me."),
    ("Your town is building a new train line.",
     "It will connect us to the city and bring new life to the area.",
     "It will take forever, cost too much and never work properly."),
    ("You had a disagreement with your roommate.",
     "We can talk it through and probably settle it calmly.",
     "Living together is going to be unbearable from now on."),
    ("Your pepper seedlings are small and weak.",
     "With some sun and care they will grow strong.",
     "They will all wilt, just like last year."),
    ("You are giving a toast at your friend's wedding.",
     "It will be a warm moment, and people will enjoy my words.",
     "I will stumble over every line and ruin the wedding."),
    ("Your science experiment gave unexpected results.",
     "Unexpected results might point to something interesting.",
     "The experiment is a failure and all the work was wasted."),
    ("You are writing your first novel.",
     "Page by page it will come together, and I might finish by next year.",
     "It will never be good enough for anyone to read."),
    ("A colleague got the promotion you wanted.",
     "My turn can come next, and I can ask how to get ready for it.",
     "I will be stuck in this position for the rest of my career."),
    ("You are learning to swim at the age of forty.",
     "Plenty of adults learn, and I will be swimming laps in a few months.",
     "I am too old, and I will always be afraid of the water."),
    ("Your winter heating bill was higher than expected.",
     "I can seal the draughty windows, and the next bill will be lower.",
     "The bills will keep climbing until I cannot pay them."),
    ("A short rain shower interrupted your picnic.",
     "We can wait under the trees and carry on when the sun returns.",
     "The day is ruined, it always rains when I plan something."),
    ("You have a long list of chores this weekend.",
     "I can tackle them one by one and still have time to relax.",
     "The whole weekend is gone, and I will never get it all done."),
    ("Your band is playing its first small gig.",
     "Even a small crowd is a start, and we will have fun on stage.",
     "Nobody will come, and we will sound terrible."),
    ("You received a surprise bill from the hospital.",
     "I can call them, ask questions and set up a payment plan.",
     "This bill is going to sink me financially."),
    ("Your community garden needs more volunteers.",
     "If we spread the word, new neighbours will join in.",
     "Nobody cares anymore, and the garden will be abandoned."),
    ("You have just retired after forty years of work.",
     "Now I have time for hobbies, travel and family.",
     "My useful years are over, and I will be bored and forgotten."),
    ("Your sports club is short of money this year.",
     "A fundraiser could bring the community together and fix it.",
     "The club will have to close down for good."),
    ("A wrong turn added twenty minutes to your drive.",
     "I can enjoy the music a bit longer, and I will still arrive.",
     "I am always late, and everyone will be annoyed with me."),
)

# Question frames around a situation: the first three ask the train questions, the last three the test ones.
FRAMES: tuple[str, ...] = (
    "{situation} How do you see it?",
    "{situation} Which thought is closer to your own?",
    "Imagine this: {situation} What would you tell yourself?",
    "Here is what happened: {situation} Which reaction fits you better?",
    "{situation} What do you expect will happen from here?",
    "Picture the following. {situation} What is your outlook?",
)
TRAIN_FRAMES = 3


class ABError(ValueError):
    """An A/B question file is unusable."""


@dataclass(frozen=True)
class ABQuestion:
    """One A/B question: its text (choices included) and the letter of the behaviour-matching answer."""

    question: str
    matching: str

    @property
    def other(self) -> str:
        return "B" if self.matching == "A" else "A"

    def record(self) -> dict[str, str]:
        """The CAA-format JSON object."""
        return {"question": self.question, "answer_matching_behavior": f"({self.matching})",
                "answer_not_matching_behavior": f"({self.other})"}


def format_question(prompt: str, choice_a: str, choice_b: str) -> str:
    """CAA's layout: the question, a blank line, `Choices:` and one ` (X) text` line per choice."""
    return f"{prompt}\n\nChoices:\n (A) {choice_a}\n (B) {choice_b}"


def answer_letter(value: object) -> str | None:
    """A or B from "(A)", " (A)", "A" or a one-item list of those; None otherwise."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str):
        return None
    match = re.fullmatch(r"\s*\(?\s*([AB])\s*\)?\s*", value)
    return match.group(1) if match else None


def parse_question(record: object, where: str = "question") -> ABQuestion:
    if not isinstance(record, dict):
        raise ABError(f"{where}: not a JSON object")
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ABError(f"{where}: needs a non-empty string `question`")
    matching = answer_letter(record.get("answer_matching_behavior"))
    other = answer_letter(record.get("answer_not_matching_behavior"))
    if matching is None or other is None or matching == other:
        raise ABError(f"{where}: answer_matching_behavior and answer_not_matching_behavior must be (A) and (B), "
                      f"one each; got {record.get('answer_matching_behavior')!r} and "
                      f"{record.get('answer_not_matching_behavior')!r}")
    return ABQuestion(question, matching)


def load_questions(path: Path) -> list[ABQuestion]:
    """Every question of a CAA-format JSONL file (a JSON array of the same objects is accepted too)."""
    text = path.read_text()
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise ABError(f"{path}: not JSON ({err})") from err
        questions = [parse_question(r, f"{path}: item {i}") for i, r in enumerate(records)]
    else:
        questions = [parse_question(record, f"{path}:{number}")
                     for number, record in numbered_records(path, text, ABError)]
    if not questions:
        raise ABError(f"{path} has no questions")
    return questions


# A choice marker at the start of a line: optional indent, then (A) or (B).
_CHOICE = re.compile(r"^[ \t]*\(([AB])\)", re.MULTILINE)


def swap_choices(question: ABQuestion) -> ABQuestion | None:
    """The same question with the texts of choices (A) and (B) exchanged, so the matching answer changes
    letter; None when the text has no `(A)` line followed by a `(B)` line (the last of each is used)."""
    text = question.question
    markers = {m.group(1): m for m in _CHOICE.finditer(text)}
    a, b = markers.get("A"), markers.get("B")
    if a is None or b is None or a.end() > b.start():
        return None
    a_segment, b_segment = text[a.end():b.start()], text[b.end():]
    a_text, b_text = a_segment.rstrip(), b_segment.rstrip()
    swapped = (text[:a.end()] + b_text + a_segment[len(a_text):] + text[b.start():b.end()] + a_text
               + b_segment[len(b_text):])
    return ABQuestion(swapped, question.other)


def with_matching(question: ABQuestion, letter: str) -> ABQuestion | None:
    """The question with its matching answer under `letter` (swapping the choices if needed); None when
    it would need a swap that the text does not allow."""
    return question if question.matching == letter else swap_choices(question)


# The shipped set.

def behaviour_questions(situations: tuple[tuple[str, str, str], ...] = SITUATIONS,
                        frames: tuple[str, ...] = FRAMES) -> tuple[list[ABQuestion], list[ABQuestion]]:
    """The optimism train and test splits: a seeded 60/40 split of the situations, each split asked in
    its own frames; the matching (hopeful) answer is A for exactly half of each split, seeded."""
    rng = random.Random(SPLIT_SEED)
    order = list(range(len(situations)))
    rng.shuffle(order)
    groups = ((sorted(order[:TRAIN_SITUATIONS]), frames[:TRAIN_FRAMES]),
              (sorted(order[TRAIN_SITUATIONS:]), frames[TRAIN_FRAMES:]))
    splits = []
    for indices, split_frames in groups:
        items = [(situations[i], frame) for i in indices for frame in split_frames]
        letters = [LETTERS[k % 2] for k in range(len(items))]
        rng.shuffle(letters)
        questions = []
        for ((situation, hopeful, gloomy), frame), letter in zip(items, letters):
            prompt = frame.format(situation=situation)
            choices = (hopeful, gloomy) if letter == "A" else (gloomy, hopeful)
            questions.append(ABQuestion(format_question(prompt, *choices), letter))
        splits.append(questions)
    return splits[0], splits[1]


def ab_pairs(questions: list[ABQuestion]) -> list[dict[str, str]]:
    """Completion-contrast pairs for `train-vector` (CAA): the question followed by the matching letter
    vs the same question followed by the other; the last token, read by the trainer, is the letter."""
    return [{"prompt": q.question, "positive": f"({q.matching}", "negative": f"({q.other}"} for q in questions]


def ab_files(name: str = BEHAVIOUR) -> dict[str, str]:
    """File name → content of the shipped set: ab_NAME_{train,test}.jsonl and ab_NAME_pairs.jsonl."""
    train, test = behaviour_questions()

    def lines(rows: list[dict[str, str]]) -> str:
        return "".join(json.dumps(r) + "\n" for r in rows)

    return {f"ab_{name}_train.jsonl": lines([q.record() for q in train]),
            f"ab_{name}_test.jsonl": lines([q.record() for q in test]),
            f"ab_{name}_pairs.jsonl": lines(ab_pairs(train))}


def write_ab_files(out: Path, name: str = BEHAVIOUR) -> dict[str, int]:
    """Write the shipped set to `out` (files left untouched when identical); lines per file."""

    counts = {}
    for file, text in ab_files(name).items():
        write_if_changed(out / file, text)
        counts[file] = text.count("\n")
    return counts
