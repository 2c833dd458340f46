"""What the query attacks are, in words, importable without torch (front ends' --help and labels).

The attacks themselves are retrieval.attacks.attack_query; this module only names them.
"""
from __future__ import annotations

__all__ = ["QUERY_ATTACKS", "AUTOATTACK_CONFIGURATION"]

# kind → what it does (labels for front ends)
QUERY_ATTACKS = {
    "untargeted": "untargeted top-k (push the clean top-k out)",
    "targeted": "targeted (pull a chosen gallery image into the top-k)",
    "autoattack": "AutoAttack (nearest neighbour as a classifier: move the top-1)",
}

# What kind="autoattack" runs, in words: front ends print it next to every AutoAttack result.
AUTOATTACK_CONFIGURATION = (
    "robret's AutoAttack configuration: pyautoattack's APGD-CE and APGD-DLR (version='custom', the given "
    "number of iterations, seed 0), untargeted, on nearest-neighbour search over the gallery as a classifier "
    "(logits = cosine similarity / 0.05; success = the top-1 moved). This is not RobustBench's standard "
    "evaluation (APGD-CE, APGD-T, FAB-T and Square on a labelled classifier): its numbers are not comparable "
    "with RobustBench's.")
