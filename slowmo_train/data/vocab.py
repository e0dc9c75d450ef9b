"""The subword vocabulary's special token ids, fixed when the sentencepiece model is trained
(data/subword.py) and read by the token batches, the transformer's embedding and padding mask, and
beam search. They belong to the data: the model only reads them.
"""

PAD, UNK, BOS, EOS = 0, 1, 2, 3
