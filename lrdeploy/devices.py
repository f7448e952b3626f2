"""--device for every command: auto | cpu | cuda, checked and resolved in one place."""

from __future__ import annotations

from lrdeploy.errors import LrdError

DEVICES = ("auto", "cpu", "cuda")
NO_CUDA = "--device cuda was asked for but no CUDA device is available"


def check_device(device: str) -> str:
    if device not in DEVICES:
        raise LrdError(f"unknown device '{device}'; choose auto, cpu or cuda")
    return device


def torch_device(device: str):
    """The torch device DEVICE stands for: auto takes CUDA where torch sees a GPU."""
    import torch

    check_device(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise LrdError(NO_CUDA)
    return torch.device(device)
