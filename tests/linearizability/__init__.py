"""The linearizability checker of the test suite (issue 11's instrument for high availability).

- :mod:`.recorder`: concurrent clients on one or more endpoints record a :class:`.history.History`
  (invocation and response times, inputs, outputs with header revisions; errors and timeouts are
  unknown outcomes);
- :mod:`.lincheck`: builds and runs the Go checker in ``checker/`` (porcupine with an etcd KV model,
  documented in ``checker/main.go``), which decides the history.

tests/test_linearizability.py uses both, and shows the checker rejects a planted stale read.
"""
