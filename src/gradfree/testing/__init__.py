"""Offline test fixtures built in code: tiny models and tokenizer (:mod:`.tiny`) and planted
teacher/student problems whose exact answer is known (:mod:`.planted`)."""
