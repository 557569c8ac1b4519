"""Draft architectures by the name a checkpoint's ``config.json`` stores in ``architectures[0]``.

Each entry names the module and class that implement the architecture. The
module is imported only when the architecture is used, so a checkpoint of an
architecture whose module is absent fails with a message naming the module
instead of failing at import time for every other architecture.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Literal

from transformers import PretrainedConfig, PreTrainedModel

DraftFamily = Literal["dspark", "eagle3"]


class UnsupportedArchitectureError(ValueError):
    """A checkpoint names an architecture that is unknown or whose module cannot be imported."""


@dataclass(frozen=True)
class DraftArchitecture:
    """How to build one draft architecture.

    ``family`` selects the checkpoint conventions: DSpark and DFlash drafts
    share ``dspark``. ``model_type`` is the ``model_type`` the draft's
    ``config.json`` carries, and ``target_model_types`` lists the target
    config ``model_type`` values (outer or text config) the draft can serve.
    """

    name: str
    module: str
    family: DraftFamily
    model_type: str
    target_model_types: tuple[str, ...]
    config_class_name: str | None = None

    def model_class(self) -> type[PreTrainedModel]:
        """Import and return the model class, or raise UnsupportedArchitectureError naming the module."""
        try:
            module = importlib.import_module(self.module)
        except ModuleNotFoundError as error:
            if error.name is None or not self.module.startswith(error.name):
                raise
            raise UnsupportedArchitectureError(
                f"architecture {self.name} is not supported yet: its module {self.module} is not present in this "
                f"installation of deepspec; available architectures: {', '.join(available_architectures())}"
            ) from error
        model_class = getattr(module, self.name, None)
        if model_class is None:
            raise UnsupportedArchitectureError(
                f"architecture {self.name} is not supported yet: module {self.module} does not define {self.name}; "
                f"available architectures: {', '.join(available_architectures())}"
            )
        return model_class

    def config_class(self) -> type[PretrainedConfig]:
        """Return the config class: ``config_class_name`` from the module, else the model's ``config_class``."""
        model_class = self.model_class()
        if self.config_class_name is None:
            return model_class.config_class
        return getattr(importlib.import_module(self.module), self.config_class_name)

    def build_config(self, values: dict[str, Any]) -> PretrainedConfig:
        """Build the config object from ``config.json`` content."""
        return self.config_class().from_dict(values)


# One line per architecture. DeepSpec's evaluator also accepts the legacy name Eagle3DraftModel for Qwen3
# Eagle3 drafts. No released checkpoint uses it, so it is not listed.
ARCHITECTURES: dict[str, DraftArchitecture] = {
    arch.name: arch
    for arch in (
        DraftArchitecture("Qwen3DSparkModel", "deepspec.drafts.dspark", "dspark", "qwen3", ("qwen3",)),
        DraftArchitecture(
            "Gemma4DSparkModel", "deepspec.drafts.dspark_gemma4", "dspark", "gemma4_text", ("gemma4", "gemma4_text")
        ),
        DraftArchitecture("Qwen3Eagle3Model", "deepspec.drafts.eagle3", "eagle3", "qwen3", ("qwen3",)),
        DraftArchitecture(
            "Gemma4Eagle3Model", "deepspec.drafts.eagle3", "eagle3", "gemma4_text", ("gemma4", "gemma4_text")
        ),
    )
}


def known_architectures() -> list[str]:
    """Return every registered architecture name, whether or not its module imports."""
    return sorted(ARCHITECTURES)


def available_architectures() -> list[str]:
    """Return the registered architectures whose module and class import."""
    available = []
    for name, arch in sorted(ARCHITECTURES.items()):
        try:
            module = importlib.import_module(arch.module)
        except ImportError:
            continue
        if hasattr(module, name):
            available.append(name)
    return available


def get_architecture(name: str | None) -> DraftArchitecture:
    """Return the registry entry for ``name``, or raise UnsupportedArchitectureError listing the known names."""
    arch = ARCHITECTURES.get(name or "")
    if arch is None:
        raise UnsupportedArchitectureError(
            f"architecture {name} is not supported; known: {', '.join(known_architectures())}"
        )
    return arch


def architecture_of(config: PretrainedConfig | dict[str, Any]) -> DraftArchitecture:
    """Return the registry entry for a draft config object or ``config.json`` dict (its ``architectures[0]``)."""
    architectures = config.get("architectures") if isinstance(config, dict) else getattr(config, "architectures", None)
    if not architectures:
        raise UnsupportedArchitectureError(
            f"draft config has no architectures entry; set architectures to one of: {', '.join(known_architectures())}"
        )
    return get_architecture(architectures[0])
