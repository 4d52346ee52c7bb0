"""Near-duplicate dialogues through MinHash LSH (datasketch) over character shingles."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from finetune.errors import ConfigError

log = logging.getLogger(__name__)


def shingles(text: str, size: int = 5) -> set[str]:
    """Character n-grams of `text` with whitespace removed: Chinese has no word spaces."""
    compact = "".join(text.split())
    if len(compact) <= size:
        return {compact} if compact else set()
    return {compact[i : i + size] for i in range(len(compact) - size + 1)}


def check_threshold(threshold: float) -> None:
    """ConfigError unless `threshold` is a similarity in (0, 1]."""
    if not 0.0 < threshold <= 1.0:
        raise ConfigError(f"the near-duplicate threshold must be in (0, 1], got {threshold}")


def near_duplicate_groups(
    items: Sequence[tuple[str, str]],
    threshold: float = 0.85,
    num_perm: int = 128,
    shingle_size: int = 5,
) -> list[list[str]]:
    """Groups of ids whose texts have an estimated Jaccard similarity of at least `threshold`.

    LSH gives candidates; each candidate pair is confirmed on the MinHash Jaccard estimate, and
    confirmed pairs are joined transitively. Groups keep the input order, so the first id of a
    group is the one a cleaner keeps. Only groups of two or more are returned.
    """
    from datasketch import MinHash, MinHashLSH

    check_threshold(threshold)
    if len({item_id for item_id, _ in items}) < 2:
        return []  # nothing to pair (and the LSH's set-up costs more than a small file's check)
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    hashes: dict[str, MinHash] = {}
    order: dict[str, int] = {}
    for index, (item_id, text) in enumerate(items):
        if item_id in hashes:
            continue  # a repeated id is reported by the row checks, not here
        minhash = MinHash(num_perm=num_perm, seed=1)
        minhash.update_batch([s.encode("utf-8") for s in shingles(text, shingle_size)])
        hashes[item_id] = minhash
        order[item_id] = index
        lsh.insert(item_id, minhash)

    parent = {item_id: item_id for item_id in hashes}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for item_id, minhash in hashes.items():
        for other in lsh.query(minhash):
            if other == item_id or minhash.jaccard(hashes[other]) < threshold:
                continue
            a, b = find(item_id), find(other)
            if a != b:
                # the earlier row becomes the root, so it is the one kept
                if order[a] < order[b]:
                    parent[b] = a
                else:
                    parent[a] = b

    groups: dict[str, list[str]] = {}
    for item_id in hashes:
        groups.setdefault(find(item_id), []).append(item_id)
    result = [sorted(g, key=order.__getitem__) for g in groups.values() if len(g) > 1]
    result.sort(key=lambda g: order[g[0]])
    log.debug("near-duplicates: %d groups among %d dialogues", len(result), len(hashes))
    return result
