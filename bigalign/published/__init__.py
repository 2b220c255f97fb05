"""Published models in bigalign: their architectures as configs, their weights as a run.

`open_clip.py` reads open_clip / OpenAI CLIP state dicts, `big_vision.py` big_vision
SigLIP .npz checkpoints; each gives the config of the same architecture (the tower
options in models/) and the parameters in bigalign's tree, every source tensor used
exactly once. `imported_run.py` writes them as a bigalign workdir that
`bigalign.load`, `model.<tower>.init_from` (LiT) and `model.init_from` (fine-tuning)
accept. The command lines are tools/import_open_clip.py and tools/import_big_vision.py.
"""
