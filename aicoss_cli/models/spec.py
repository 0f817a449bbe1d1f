"""What the registry knows about an arch (`ArchSpec`), and the table the zoo fills (`ArchTable`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ArchSpec:
    """One arch: its builder and how the seed's tables name it."""

    name: str
    builder: Builder  # builder(num_classes, *, pretrained: bool, img_size: int, arch: str) -> nn.Module
    description: str
    backbone: str  # display name, as the seed's parameter table writes it
    decoder: str
    img_size: int = 224


class ArchTable:
    """Arch name -> `ArchSpec`, filled by decorating builders with `register`."""

    def __init__(self):
        self.specs: dict[str, ArchSpec] = {}
        self.descriptions: dict[str, str] = {}

    def register(self, name: str, *, description: str, display: tuple[str, str],
                 img_size: int = 224) -> Callable[[Builder], Builder]:
        """Decorator: register `builder(num_classes, *, pretrained, img_size, arch)` under `name`."""

        def decorate(builder: Builder) -> Builder:
            if name in self.specs:
                raise ValueError(f"arch {name!r} registered twice")
            self.specs[name] = ArchSpec(name, builder, description, display[0], display[1], img_size)
            self.descriptions[name] = description
            return builder

        return decorate
