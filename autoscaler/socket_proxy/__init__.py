"""The Docker socket proxy: an allow-list in front of the Engine API that parses every request it passes.

Run from the autoscaler's image (`python -m autoscaler.socket_proxy`; deploy/compose.socket-proxy.yaml,
deploy/swarm-stack.yaml). Each request is read whole (bounded), parsed strictly, judged against the calls
the Compose and Swarm backends make (`calls`), and, if allowed, a request the proxy builds itself is sent
to the engine: method, path, a re-encoded query and the re-serialized JSON that was judged. The client's
bytes never reach the engine. A create is allowed only if it is exactly a clone of a container of a
labelled pool service (`clones`); a Swarm service update only if it changes nothing but the replica count
of a labelled pool service of one of its stacks (`services`).

Nothing here imports the controller (lint-imports checks it): the proxy trusts no part of the process it
guards.
"""
