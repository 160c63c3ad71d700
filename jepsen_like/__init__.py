"""jepsen_like: fault injection against real Iris clusters on this machine.

``cluster`` starts, kills, pauses and restarts real ``iris core`` processes;
``proxy`` puts a controllable TCP proxy on every Raft link so links can be
cut, blackholed, reset or delayed without root.
"""
