"""The convergence checker: seeded multi-node workloads with faults, judged by an oracle."""
