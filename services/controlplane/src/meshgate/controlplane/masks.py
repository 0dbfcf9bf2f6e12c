"""Field-mask updates (AIP-134) over protobuf messages.

An update names the fields it changes; an empty mask or `*` means every
mutable field. Paths are top-level field names. A path that is unknown, output
only or immutable is refused, so a caller never believes a change was made
that was not.
"""

from __future__ import annotations

from meshgate.common.errors import FieldViolation


def resolve(
    paths: list[str], mutable: frozenset[str], all_fields: frozenset[str], mask_field: str = "update_mask"
) -> tuple[list[str], list[FieldViolation]]:
    if not paths or paths == ["*"]:
        return sorted(mutable), []
    violations = []
    for i, p in enumerate(paths):
        if p in mutable:
            continue
        if p in all_fields:
            why = "is not mutable (output only or immutable)"
        else:
            why = "is not a field of the resource"
        violations.append(FieldViolation(f"{mask_field}.paths[{i}]", f"{p!r} {why}"))
    return list(dict.fromkeys(paths)), violations


def apply(src, dst, paths: list[str]) -> None:
    """Copy the fields named by `paths` from `src` into `dst`."""
    fields = dst.DESCRIPTOR.fields_by_name
    for path in paths:
        f = fields[path]
        if f.is_repeated:
            dst.ClearField(path)
            target = getattr(dst, path)
            source = getattr(src, path)
            if f.message_type is not None and f.message_type.GetOptions().map_entry:
                target.update(source)
            elif f.message_type is not None:
                for item in source:
                    target.add().CopyFrom(item)
            else:
                target.extend(source)
        elif f.message_type is not None or f.has_presence:
            if src.HasField(path):
                if f.message_type is not None:
                    getattr(dst, path).CopyFrom(getattr(src, path))
                else:
                    setattr(dst, path, getattr(src, path))
            else:
                dst.ClearField(path)
        else:
            setattr(dst, path, getattr(src, path))
