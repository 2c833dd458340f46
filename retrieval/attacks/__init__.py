"""Attacks on rankings (DESIGN.md, "Attacks on rankings"): PGD in [0, 1] pixel space on any Encoder.

The engine (PGD, PGDConfig, the pyautoattack wrapper) lives in encoder/attack/ and is re-exported
here; this package holds the ranking objectives:

    ranking.py     robrank's suite: CA±, QA±, SP-QA, ES, TMA, LTM, GTM, GTT
    topk.py        top-k attacks for the UI (untargeted / targeted) and the Recall@1 margin attack
    autoattack.py  nearest-neighbour search as a classifier, attacked with pyautoattack
    suite.py       the whole robrank suite on a dataset, and its ERS
    query.py       attack_query: one query against a gallery, reported next to its certificate
    _embed.py      what an attack perturbs (query_image) and the map it differentiates (ImageEmbedder)
"""
from .autoattack import NearestNeighbourClassifier, autoattack_targeted, autoattack_untargeted
from encoder.attack import ROBRANK_LINF, PGDConfig, perturbation_norm, pgd, project
from .ranking import (ATTACKS, AttackResult, candidate_attack, embedding_shift, greedy_top1_misrank,
                      greedy_top1_translocation, learning_to_misrank, query_attack, run_attack,
                      targeted_mismatch)
from .suite import SUITE_ATTACKS, SuiteResult, robrank_suite
from .topk import TopKAttackResult, misrank_top1, topk_targeted, topk_untargeted
from .query import (AUTOATTACK_CONFIGURATION, QUERY_ATTACKS, CertificateCheck, QueryAttackOutcome, RankedIds, Ranking, rank_moves, VectorGallery, attack_candidates,
                    attack_query, rank_query)
from ._embed import ImageEmbedder, QueryImage, WorkingCopy, query_image, working_copy

__all__ = [
    "AUTOATTACK_CONFIGURATION", "QUERY_ATTACKS", "WorkingCopy", "working_copy", "CertificateCheck", "QueryAttackOutcome", "RankedIds", "Ranking", "rank_moves", "VectorGallery", "attack_candidates",
    "attack_query", "rank_query", "QueryImage", "query_image",
    "ATTACKS", "AttackResult", "ImageEmbedder", "NearestNeighbourClassifier", "PGDConfig", "ROBRANK_LINF",
    "SUITE_ATTACKS", "SuiteResult", "TopKAttackResult", "autoattack_targeted", "autoattack_untargeted", "candidate_attack", "embedding_shift",
    "greedy_top1_misrank", "greedy_top1_translocation", "learning_to_misrank", "misrank_top1",
    "perturbation_norm", "pgd", "project", "query_attack", "robrank_suite", "run_attack", "targeted_mismatch", "topk_targeted",
    "topk_untargeted",
]
