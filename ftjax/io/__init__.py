"""Checkpoint I/O: a strict safetensors reader/streaming writer and Hugging Face model directories."""

from ftjax.io.checkpoint import (
    HFCheckpoint,
    HFCheckpointWriter,
    atomic_output_dir,
    copy_aux_files,
    plan_shards,
    resolve_model_path,
    save_hf,
)
from ftjax.io.safetensors import DTYPES, SafetensorsFile, SafetensorsWriter, TensorInfo, dtype_code

__all__ = [
    "DTYPES",
    "HFCheckpoint",
    "HFCheckpointWriter",
    "SafetensorsFile",
    "SafetensorsWriter",
    "TensorInfo",
    "atomic_output_dir",
    "copy_aux_files",
    "dtype_code",
    "plan_shards",
    "resolve_model_path",
    "save_hf",
]
