"""nftables in-process: libnftables (the library the ``nft`` command is built on) through ctypes.

Running ``nft`` costs a process start and a read of the whole ruleset per command;
for a change of one policy on a node with 1,000 that was most of the time
(``BENCH policy_delta_ms``: ~25 ms of nft against ~8 ms in-process). The official
Python binding (Debian's ``python3-nftables``) is this same thin ctypes wrapper, but
it is tied to the system Python, so gatewayd binds the documented C API itself
(libnftables(3): ``nft_ctx_new``, ``nft_ctx_buffer_output``/``_error``,
``nft_run_cmd_from_buffer``, ``nft_ctx_get_output_buffer``/``_error_buffer``). The
context's netlink socket belongs to the network namespace gatewayd runs in, as the
command's would. When the library is missing, ``available()`` is false and callers
run the ``nft`` command instead.
"""

from __future__ import annotations

import ctypes

_LIB_NAMES = ("libnftables.so.1", "libnftables.so")


class LibNft:
    """The library's functions; each ``run`` uses a context of its own, made in the
    network namespace the calling thread is in at that moment (a context is not
    thread-safe, and its netlink socket stays in the namespace it was opened in)."""

    def __init__(self) -> None:
        lib = None
        for name in _LIB_NAMES:
            try:
                lib = ctypes.CDLL(name)
                break
            except OSError:
                continue
        if lib is None:
            raise OSError("libnftables is not installed")
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        for fn in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
            getattr(lib, fn).restype = ctypes.c_int
            getattr(lib, fn).argtypes = [ctypes.c_void_p]
        for fn in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
            getattr(lib, fn).restype = ctypes.c_char_p
            getattr(lib, fn).argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_ctx_free.restype = None
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        self._lib = lib

    def run(self, commands: str) -> tuple[int, str, str]:
        """(0 or the error code, output, error text) of ``nft -f`` of `commands`."""
        lib = self._lib
        ctx = lib.nft_ctx_new(0)  # NFT_CTX_DEFAULT
        if not ctx:
            raise OSError("nft_ctx_new failed")
        try:
            if lib.nft_ctx_buffer_output(ctx) != 0 or lib.nft_ctx_buffer_error(ctx) != 0:
                raise OSError("libnftables cannot buffer its output")
            rc = lib.nft_run_cmd_from_buffer(ctx, commands.encode())
            out = lib.nft_ctx_get_output_buffer(ctx) or b""
            err = lib.nft_ctx_get_error_buffer(ctx) or b""
        finally:
            lib.nft_ctx_free(ctx)
        return rc, out.decode(errors="replace"), err.decode(errors="replace")


_SHARED: LibNft | None = None
_TRIED = False


def shared() -> LibNft | None:
    """The library, loaded on first use; None without libnftables."""
    global _SHARED, _TRIED
    if not _TRIED:
        _TRIED = True
        try:
            _SHARED = LibNft()
        except (OSError, AttributeError):
            _SHARED = None
    return _SHARED
