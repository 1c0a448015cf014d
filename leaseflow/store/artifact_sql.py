"""SQL of artefacts (``lf_artifacts``): written inside a state's fenced commit, read by
name. One row per run and name: a later state's artefact of the same name replaces it."""

from __future__ import annotations

#: Inside the commit's transaction (``ctx.artifacts.put`` queues it as an in-commit write).
PUT = """
INSERT INTO lf_artifacts (run_id, name, content_type, codec, data, size_bytes, stored_bytes,
                          sha256, state, step_seq, tenant)
SELECT %(run_id)s, %(name)s, %(content_type)s, %(codec)s, %(data)s, %(size_bytes)s,
       %(stored_bytes)s, %(sha256)s, %(state)s, %(step_seq)s, tenant
  FROM lf_runs WHERE id = %(run_id)s
ON CONFLICT (run_id, name) DO UPDATE
   SET content_type = excluded.content_type, codec = excluded.codec, data = excluded.data,
       size_bytes = excluded.size_bytes, stored_bytes = excluded.stored_bytes,
       sha256 = excluded.sha256, state = excluded.state, step_seq = excluded.step_seq,
       created_at = now()
"""

_COLUMNS = (
    "run_id::text, name, content_type, size_bytes, stored_bytes, sha256, state, step_seq, "
    "created_at"
)

GET = f"SELECT {_COLUMNS}, data FROM lf_artifacts WHERE run_id = %(run_id)s AND name = %(name)s"

LIST = f"SELECT {_COLUMNS} FROM lf_artifacts WHERE run_id = %(run_id)s ORDER BY name"
