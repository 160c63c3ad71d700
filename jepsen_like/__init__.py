"""jepsen_like: a Jepsen-like fault-injection harness for Iris.

Run it with ``python -m jepsen_like list | run | check`` (see docs/harness.md),
or script it:

* :mod:`jepsen_like.cluster` starts, kills, pauses and restarts real
  ``iris core`` and ``iris edge`` processes (``open_cluster``);
* :mod:`jepsen_like.proxy` and :mod:`jepsen_like.netns` cut links (per-link
  TCP proxies, or network namespaces + iptables as root);
* :mod:`jepsen_like.nemesis` schedules faults; :mod:`jepsen_like.workloads`
  drives clients and records a :class:`jepsen_like.history.History`;
* :mod:`jepsen_like.checkers` judges histories (linearizability, messages,
  revocations, convergence, availability); :mod:`jepsen_like.runner` ties a
  scenario together and writes ``results.json``, ``report.txt`` and plots.
"""
