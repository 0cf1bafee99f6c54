"""`duphunter replay`: drive a running registry with pulls, as docker clients would, at
real time, and measure what it serves and how fast.

A workload (`workload.Workload`: images made of layers, and timed pull events by clients)
comes from an IBM registry trace (`trace`) or from a seeded generator (`synthetic`). The
replayer builds real gzip layers for it (`content`), pushes them (`http`), replays the pulls
(`runner`) and summarises latencies by serving path, hit ratio and the registry's own
counters (`report`). It is only a client of the HTTP API: nothing here imports pipelines/
or workers/.
"""
