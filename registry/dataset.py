"""The identity of Redis's data set, and the one rule that says it was lost.

Redis holds an epoch (a random id written once) and a version counter that only grows.
A sidecar knows the epoch it started on and the version its replica reached. When Redis
answers with another epoch (or none), or with a version below what the replica already
applied, Redis lost data: it restarted without persistence, or failed over to a replica
that missed writes. The change feed, the version checker and recovery all ask here, so
they cannot disagree about it.
"""

from __future__ import annotations


def loss(*, version: int, had: int, epoch: str | None, known_epoch: str) -> str | None:
    """Why Redis lost the data set, or None when it did not.

    ``had`` must be the replica's version from *before* the question was sent: the change
    feed keeps applying newer entries while the answer is on its way, and comparing with
    the version after it would see Redis "behind" whenever the feed is quick.
    """
    if epoch != known_epoch:
        return f"Redis lost the registry: epoch {epoch} (was {known_epoch})"
    if version < had:
        return f"Redis lost the registry: its version {version} is behind the replica's {had}"
    return None
