"""Offline test fixtures built in code: tiny models and tokenizer (:mod:`.tiny`), planted
teacher/student problems whose exact answer is known (:mod:`.planted`), and the scramble of every
exact surgery transform at once (:mod:`.scramble`)."""
