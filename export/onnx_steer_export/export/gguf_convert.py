"""Rewrite a quantized GGUF file with float weights (F32 or F16), keeping every metadata key.

The peers benchmark (bench/peers.py) runs llama.cpp on the very weights the bundles were exported
from: the default model ships as Q4_1, which the exporter dequantizes to fp32, so an F32 GGUF of the
same dequantized values is the like-for-like llama.cpp baseline of the fp32 bundle.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

FLOAT_TYPES = {"f32": (np.float32, "F32"), "f16": (np.float16, "F16")}
# llama.cpp's own converters keep these in F32 whatever the output type: norms and 1-D tensors.
KEEP_F32_NDIM = 1


def dequantize_gguf(source: Path, target: Path, dtype: str) -> Path:
    """Write `source` to `target` with every tensor dequantized to `dtype` ('f32' or 'f16');
    1-D tensors (norms) stay F32. Returns `target`."""
    import gguf

    if dtype not in FLOAT_TYPES:
        raise ValueError(f"dtype must be one of {sorted(FLOAT_TYPES)}, got {dtype!r}")
    numpy_type, type_name = FLOAT_TYPES[dtype]
    reader = gguf.GGUFReader(str(source))
    architecture = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(str(target), arch=architecture)
    file_type = gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16
    for field in reader.fields.values():
        # The writer adds the architecture and the GGUF.* header fields itself.
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        value = int(file_type) if field.name == gguf.Keys.General.FILE_TYPE else field.contents()
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, value_type, sub_type=sub_type)
    for tensor in tqdm(reader.tensors, desc=f"dequantizing to {type_name}", unit="tensor"):
        weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        keep_f32 = weights.ndim == KEEP_F32_NDIM
        writer.add_tensor(tensor.name, weights.astype(np.float32 if keep_f32 else numpy_type))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target
