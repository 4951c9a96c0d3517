"""Training and evaluation code of the learned models (not imported by the node at run time):
the trainers behind `qa-node train MODEL` (``n2q_train``, ``d2iqa_train``), the projection-domain
low-dose simulation (``dose_sim``) and the synthetic anatomical phantoms (``phantoms``)."""
