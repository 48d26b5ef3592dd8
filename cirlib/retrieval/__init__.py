"""The retrieval room: gallery and query features, stage-I search, the top-k file, stage-II re-ranking.
"""
