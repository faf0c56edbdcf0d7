"""Output writers: a streaming safetensors folder, and nanoGPT's ``ckpt.pt`` beside it on request."""

from ckptavg.writers.nanogpt_ckpt import ckpt_training_state, write_nanogpt_ckpt
from ckptavg.writers.safetensors_folder import FolderWriter

__all__ = ["FolderWriter", "ckpt_training_state", "write_nanogpt_ckpt"]
