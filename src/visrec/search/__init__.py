"""Architecture search under a compute budget: the search space as data (:mod:`visrec.search.space`) and the
budget every candidate must meet before it is trained."""
