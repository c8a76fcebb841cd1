"""UCM sparse attention: a framework whose plug-ins choose which KV blocks each decode step reads.

``UcmSparseBase`` is the contract (scheduler-side and worker-side hooks); ``BlockRetrieval`` is the
shared machinery of block-retrieval algorithms (sink and recent windows, a token budget, a
retrieval stride, per-block summaries); ``block_mean``, ``key_bounds`` and ``hash_codes`` are the
algorithms that come with it. Algorithms are found through the ``ucm.sparse`` entry-point group.
"""

from ucm.sparse.base import UcmSparseBase
from ucm.sparse.config import SparseConfig
from ucm.sparse.retrieval import BlockRetrieval


def load_algorithm(name: str) -> type[UcmSparseBase]:
    """The algorithm class registered as ``name`` in the ``ucm.sparse`` entry-point group."""
    from ucm.store.plugins import load_plugin

    return load_plugin("ucm.sparse", name, UcmSparseBase)


def create(config: SparseConfig | dict) -> UcmSparseBase:
    """An instance of the configured algorithm (``config`` as a :class:`SparseConfig` or its dict)."""
    if not isinstance(config, SparseConfig):
        config = SparseConfig.from_dict(config)
    return load_algorithm(config.algorithm)(config)


__all__ = ["BlockRetrieval", "SparseConfig", "UcmSparseBase", "create", "load_algorithm"]
