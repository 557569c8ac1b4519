"""Register deepspec's ``pytorchjob`` scheduler with TorchX (found by scanning the ``torchx_plugins`` namespace)."""

from __future__ import annotations

from typing import Any

from torchx.plugins import register
from torchx.schedulers.api import Scheduler


@register.scheduler(name="pytorchjob")
def pytorchjob(session_name: str, **kwargs: Any) -> Scheduler:
    """Return the scheduler that submits each app as a Kubeflow PyTorchJob."""
    from deepspec.launch.pytorchjob import create_scheduler

    return create_scheduler(session_name, **kwargs)
