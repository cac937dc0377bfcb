"""Parallel embedding generation on Apache Airflow.

Pure, typed steps (``corpus`` → ``chunking`` → ``batching`` → ``embedders`` → ``aggregate`` → ``store`` →
``compare``) wired into the DAG ``parallel_embeddings`` (``pipeline/dags/parallel_embeddings.py``).
Nothing here imports Airflow at module level except ``compat``, ``runner`` and the DAG file.
"""

__version__ = "0.1.0"
DAG_ID = "parallel_embeddings"
# Airflow pool of the embed_batch task instances: its slots cap concurrent calls to the embedding API.
EMBED_POOL = "embedding_api"
EMBED_POOL_DEFAULT_SLOTS = 16
# Airflow connection of object storage (s3://… work_dir / store_uri): Airflow's own default for AWS.
OBJECT_STORAGE_CONN_ID = "aws_default"
