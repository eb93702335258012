"""The Patch protocol: a named, switchable change applied to a model (a fix or a fast kernel)."""

from __future__ import annotations

from typing import Any


class Patch:
    """A named change to a model that users can switch off by name.

    Subclasses set :attr:`name`, decide in :meth:`applies_to` whether the model needs
    them (architecture, device, installed kernels) and make the change in :meth:`apply`;
    :meth:`revert` undoes it where that is possible. Register a patch with
    ``register("patch", "MyPatch", "pkg.mod:MyPatch")``; ``TransformersModel(patches=[...])``
    applies the listed ones, ``disabled_patches=[...]`` switches named ones off and
    ``enabled_patches=[...]`` adds ones that are off by default.

    Example::

        class UpcastLogits(Patch):
            name = "UpcastLogits"
            def apply(self, model):
                model.config.upcast_logits = True
    """

    #: The registry name users switch it on/off with.
    name: str = ""
    #: Whether the patch runs when no list of patches is given.
    enabled_by_default: bool = False

    def applies_to(self, model: Any) -> bool:
        """Whether this patch makes sense for ``model`` (default: always)."""
        return True

    def apply(self, model: Any) -> None:
        """Change ``model`` (or the classes it uses) in place."""

    def revert(self, model: Any) -> None:
        """Undo :meth:`apply` where possible (default: nothing to undo)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name or type(self).__name__!r})"
