"""Mixed precision: autocast around the forward pass and loss, and a gradient scaler for fp16.

    precision = Precision("bf16", device)
    with precision.autocast():
        loss, units = task.loss(model, batch)
    precision.backward(loss)
    stepped = precision.step(optimizer)    # False when fp16 found inf/NaN gradients and skipped

``fp32`` does nothing; ``bf16`` autocasts (no scaler: bf16 has fp32's exponent range); ``fp16``
autocasts and scales the loss (Micikevicius et al., "Mixed Precision Training", ICLR 2018). A step the
scaler skips still runs the algorithm's communication hooks, so ranks never fall out of step: with
AR-SGD the gradients were averaged before the check, so every rank skips together; with Local SGD
or gossip a rank that skips simply contributes its unchanged parameters to the next average, and the
next exact average (Local SGD's, SlowMo's outer step) makes the replicas identical again
(tests/test_precision.py injects an inf gradient on one of 2 ranks and checks all of this).

Host-device synchronisation: fp32 and bf16 add none. fp16 reads the scale after each step to count
skips; ``GradScaler.step`` itself already reads its inf flag on the host for non-fused optimizers,
so by then the device queue is drained and the extra read costs no further stall.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def configure_device_math(device: torch.device, tf32: bool) -> str:
    """The GPU settings a practitioner expects, set once per process (no-ops on the CPU):
    cuDNN picks the fastest convolution algorithm for each shape (``cudnn.benchmark``: the shapes
    of image batches repeat), and fp32 matmuls/convolutions use TF32 tensor cores where the GPU
    has them (``train.tf32``). Returns a description for the log."""
    if device.type != "cuda":
        return "cpu"
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    has_tf32 = torch.cuda.get_device_capability(device)[0] >= 8
    return (
        f"{torch.cuda.get_device_name(device)}, cudnn.benchmark on, "
        f"TF32 {'on' if tf32 and has_tf32 else 'off'}{'' if has_tf32 else ' (not on this GPU)'}"
    )


class Precision:
    def __init__(self, mode: str, device: torch.device):
        if mode not in DTYPES:
            raise ValueError(f"train.precision={mode!r} is unknown; choose one of {', '.join(DTYPES)}")
        self.mode, self.device_type, self.dtype = mode, device.type, DTYPES[mode]
        self.scaler = torch.amp.GradScaler(device.type, enabled=True) if mode == "fp16" else None
        self.skipped_steps = 0

    def autocast(self):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Take the optimizer step; False if the fp16 scaler skipped it (non-finite gradients).
        Reading the skip costs a host-device sync, so only fp16 pays it."""
        if self.scaler is None:
            optimizer.step()
            return True
        scale_before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        stepped = self.scaler.get_scale() >= scale_before
        self.skipped_steps += int(not stepped)
        return stepped

    def state_dict(self) -> dict:
        return {
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
