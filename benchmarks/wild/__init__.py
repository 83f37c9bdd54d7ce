"""The wild zoo: Fashion-MNIST models trained outside trojanscan, with ground truth.

Its own training loop (:mod:`.recipes`), architectures (:mod:`.nets`) and triggers
(:mod:`.triggers`) — nothing here imports ``trojanscan.training``, ``trojanscan.zoo``,
``trojanscan.archs`` or the attack library, so nothing the detectors were tuned on leaks in.
:mod:`.families` declares the families and the development / held-out split, :mod:`.zoo`
draws and builds models, :mod:`.build` is the command line, :mod:`.run` scores detectors.
"""
