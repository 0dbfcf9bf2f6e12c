"""A message's descriptor with the type the SDK annotates it with.

types-protobuf types `Message.DESCRIPTOR` as the pure-Python `Descriptor` or
upb's (the C runtime's). At run time it is one of them, and both have the same
API, so the SDK writes the pure-Python names and takes descriptors through
`of()` instead of repeating the union at every annotation.
"""

from __future__ import annotations

from typing import cast

from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message


def of(message: Message | type[Message]) -> Descriptor:
    """The descriptor of `message` (an instance or a class)."""
    return cast(Descriptor, message.DESCRIPTOR)
