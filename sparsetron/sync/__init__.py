"""RL weight sync: lossless sparse deltas of the trainer's weights to rollout workers.

``tracker`` (change detection) → ``codec`` (delta payloads) → ``versions``/``publisher`` (what each subscriber
needs) → ``tcp`` / ``shm`` / ``broadcast`` + ``channels`` (transports) → ``subscriber`` (verified, atomic apply);
``live`` publishes from ``sparsetron train``, ``cli`` is ``sparsetron sync serve|pull``.
"""
