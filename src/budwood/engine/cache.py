"""Paged KV-cache blocks with reference counts and prefix caching.

A sequence's keys and values live in fixed-size blocks; full blocks are named by a hash of
(adapter, every token up to the block's end), so a request whose prompt starts like an earlier one
(a shared system prompt, one context scored against several continuations, the n samples of one
request) reuses the computed blocks instead of recomputing them. Freed blocks keep their contents
and hash until they are handed out again, least recently freed first.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

NULL_BLOCK = 0  # never handed out: padding in block tables points here


def block_hashes(tokens: list[int], block_size: int, adapter_key: str) -> list[bytes]:
    """One hash per full block of `tokens`, each covering every token before it too."""
    out, prev = [], adapter_key.encode()
    for i in range(len(tokens) // block_size):
        prev = hashlib.blake2b(prev + array("q", tokens[i * block_size:(i + 1) * block_size]).tobytes(),
                               digest_size=16).digest()
        out.append(prev)
    return out


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2:
            raise ValueError("the KV cache needs at least 2 blocks")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.refcount = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(1, num_blocks))
        self.hash_of: dict[int, bytes] = {}
        self.by_hash: dict[bytes, int] = {}

    def num_free(self) -> int:
        return len(self.free)

    def cached_prefix(self, hashes: list[bytes]) -> list[int]:
        """Blocks already holding the longest run of these hashes (not yet claimed)."""
        hit = []
        for h in hashes:
            b = self.by_hash.get(h)
            if b is None:
                break
            hit.append(b)
        return hit

    def claim(self, blocks: list[int]) -> None:
        for b in blocks:
            if self.refcount[b] == 0:
                del self.free[b]
            self.refcount[b] += 1

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free):
            raise MemoryError(f"KV cache: {n} blocks wanted, {len(self.free)} free")
        out = []
        for _ in range(n):
            b, _ = self.free.popitem(last=False)
            h = self.hash_of.pop(b, None)
            if h is not None and self.by_hash.get(h) == b:
                del self.by_hash[h]
            self.refcount[b] = 1
            out.append(b)
        return out

    def register(self, block: int, h: bytes) -> None:
        """Name a block that now holds a full, computed block of tokens."""
        if h in self.by_hash or block in self.hash_of:
            return
        self.hash_of[block] = h
        self.by_hash[h] = block

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            self.refcount[b] -= 1
            if self.refcount[b] == 0:
                self.free[b] = None
