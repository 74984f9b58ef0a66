"""Searching and building sharded indexes: shard searchers, the in-process backend, and Ray.

Layer 4. It may import the index, search and model layers and the leaves; never a PyTerrier transformer. Ray is
imported in :mod:`.ray_backend` and :mod:`.ray_indexing` only, and only when a Ray backend is asked for, so the
package imports and its tests run where Ray is not installed.

- :mod:`.shards`: :class:`ShardSearcher` (one shard, searched through the mode dispatch) and :class:`LocalShards`
  (every shard in this process).
- :mod:`.backends`: :func:`open_shards`, the backend a ``backend=`` argument names.
- :mod:`.ray_backend`: one Ray actor per shard.
- :mod:`.ray_indexing`: building shards as Ray tasks.
"""
