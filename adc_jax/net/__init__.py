"""Split learning over a real network: the server and each client as separate processes.

* :mod:`adc_jax.net.wire` – explicit serialisation of the protocol's messages (a small binary
  header, raw array buffers, the link's packed formats; no pickle).
* :mod:`adc_jax.net.plan` – what every message must hold (names, shapes, dtypes, codecs), built
  by both sides from the config; the handshake compares them.
* :mod:`adc_jax.net.transport` – the client's byte-counting, bandwidth- and latency-shaping
  relay, gRPC options, TLS credentials.
* :mod:`adc_jax.net.server` / :mod:`adc_jax.net.client` – the two sides.
* ``python -m adc_jax.net {server,client}`` – the command line.

gRPC comes with the ``net`` extra (``pip install adc-jax[net]``). ``docs/network.md`` tells how
to run it across machines, what the wire counts and how the two sides recover from faults.
"""
