"""Named policies: ttach's alias functions (returning :class:`Compose`) and a registry of
named :class:`Policy` factories used by the CLI (``--policy hflip``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from . import transforms as T
from .errors import InvalidInputError, unknown_name
from .policy import Compose, Policy

__all__ = [
    "flip_transform",
    "hflip_transform",
    "vflip_transform",
    "vlip_transform",
    "d4_transform",
    "multiscale_transform",
    "five_crop_transform",
    "ten_crop_transform",
    "register_policy",
    "get_policy",
    "list_policies",
    "policy_from_augmentations",
]


BASELINE = "none"  # the name of plain inference: one identity view


def flip_transform() -> Compose:
    """Identity, horizontal flip, vertical flip and both (4 views)."""
    return Compose([T.HorizontalFlip(), T.VerticalFlip()])


def hflip_transform() -> Compose:
    """Identity and horizontal flip (2 views)."""
    return Compose([T.HorizontalFlip()])


def vflip_transform() -> Compose:
    """Identity and vertical flip (2 views)."""
    return Compose([T.VerticalFlip()])


vlip_transform = vflip_transform  # ttach's spelling


def d4_transform() -> Compose:
    """The dihedral group: 4 rotations with and without a horizontal flip (8 views)."""
    return Compose([T.HorizontalFlip(), T.Rotate90(angles=[0, 90, 180, 270])])


def multiscale_transform(scales: Sequence[float], interpolation: str = "nearest") -> Compose:
    """Identity plus each scale."""
    return Compose([T.Scale(scales, interpolation=interpolation)])


def five_crop_transform(crop_height: int, crop_width: int) -> Compose:
    """Four corner crops and a centre crop (5 views)."""
    return Compose([T.FiveCrops(crop_height, crop_width)])


def ten_crop_transform(crop_height: int, crop_width: int) -> Compose:
    """Five crops of the image and of its mirror image (10 views)."""
    return Compose([T.HorizontalFlip(), T.FiveCrops(crop_height, crop_width)])


# --------------------------------------------------------------------------- named policies

_POLICIES: dict[str, Callable[[], Policy]] = {}


def register_policy(name: str) -> Callable[[Callable[[], Compose | Policy]], Callable[[], Compose | Policy]]:
    """Decorator: register a no-argument factory of a Compose or Policy under ``name``."""

    def decorate(factory):
        def build() -> Policy:
            made = factory()
            policy = made.to_policy(name) if isinstance(made, Compose) else made
            policy.name = name
            return policy

        _POLICIES[name] = build
        return factory

    return decorate


def list_policies() -> list[str]:
    """Names accepted by :func:`get_policy` (and the CLI's ``--policy``)."""
    return sorted(_POLICIES)


def get_policy(name: str) -> Policy:
    """A fresh :class:`Policy` by name, e.g. ``"none"``, ``"hflip"``, ``"d4"``."""
    if not isinstance(name, str):
        raise InvalidInputError(
            f"get_policy takes one policy name (a string such as 'hflip'), got {name!r} ({type(name).__name__}); "
            "for several names, call it once per name"
        )
    if name not in _POLICIES:
        raise unknown_name("policy", name, _POLICIES)
    return _POLICIES[name]()


register_policy("none")(Policy.identity)
register_policy("hflip")(hflip_transform)
register_policy("vflip")(vflip_transform)
register_policy("flip")(flip_transform)
register_policy("d4")(d4_transform)


@register_policy("shift")
def _shift4() -> Compose:
    # Identity and one-pixel shifts in the four axis directions (5 views).
    return Compose([T.Shift.around((1,), directions=4)])


@register_policy("hflip-shift")
def _hflip_shift() -> Compose:
    # hflip x 5 shifts (10 views): the policy a model trained with flips and shifts should like.
    return Compose([T.HorizontalFlip(), T.Shift.around((1,), directions=4)])


def policy_from_augmentations(augmentations: Sequence[dict | str]) -> Policy:
    """The TTA policy aligned with a model's training augmentations.

    ``augmentations`` is a checkpoint's ``train_augmentations`` (dicts with a ``"name"``, or
    bare names), read through the shared vocabulary of :mod:`ttakit.augmentations`: ``flip``
    adds a horizontal flip, ``shift``/``crop`` add one-pixel shifts in the four axis directions;
    ``mixup`` changes no geometry and adds nothing. With none of these the policy is the identity
    alone: TTA with views the model never saw tends to hurt. An unknown name (``"rotate"``) or a
    malformed record raises an error listing the valid ones, instead of silently giving identity.

    Example:
        >>> policy_from_augmentations(["flip"]).view_names
        ['identity', 'hflip']
    """
    from .augmentations import aligned_views  # the vocabulary shared with train and search

    policy = Policy(aligned_views(augmentations, max_shift=1), name="train-aug")
    return policy
