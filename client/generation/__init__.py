"""Generation of synthetic reports from an ICD-10 code: the reference loop
(generate), the fast path (fast, decode_engine, ring_decoder) and next-token
sampling. What is generated stays at the site; only aggregates of its
evaluation may leave.
"""
