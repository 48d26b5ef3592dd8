"""The re-ranker plug-in surface: the registry and what a new re-ranker subclasses and reads.

A new re-ranker is one file (in cirlib or outside it, found through CIRLIB_PLUGINS):

    from cirlib.models.rerankers import RERANKERS, RerankQuery, Stage2Model

    @RERANKERS.register
    class MyReranker(Stage2Model):
        name = "mine"                  # ModelConfig.reranker / the notebooks' `reranker` parameter
        needs_ref_tokens = True        # what it reads from the query (needs_z_t: stage I's text side)
        supports_shared_path = False   # or implement scores_shared too

        def build_scorer(self, config): ...                 # its modules (the ViT is the base's)
        def scores_per_pair(self, query, cand): ...         # (P,) scores of query row i against candidate i

See `Stage2Model` for every declaration and hook; `reranker_dual.py` and `reranker_joint.py` are the built-ins.
"""
from cirlib.models.stage2 import RERANKERS, RerankQuery, Stage2Model, init_bert_

Reranker = Stage2Model  # the base class under the name the registry's docs use

__all__ = ["RERANKERS", "RerankQuery", "Reranker", "Stage2Model", "init_bert_"]
