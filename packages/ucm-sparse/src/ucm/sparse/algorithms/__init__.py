"""The block-retrieval algorithms that come with ``ucm-sparse`` (entry points of the ``ucm.sparse`` group)."""
