"""Zero-shot evaluation: the lm-eval model ``grootl`` (:mod:`grootl.evaluation.lm`; importing it
registers the name), ``grootl eval`` (:mod:`.run`) and ``grootl compare`` (:mod:`.compare`)."""
