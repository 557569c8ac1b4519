"""Launching stages: TorchX components, the ``pytorchjob`` TorchX scheduler and the launch-environment check.

``deepspec.launch.worldsize`` needs only the standard library; the other modules need the ``k8s`` extra
(torchx-nightly and kubernetes).
"""
