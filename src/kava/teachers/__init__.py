"""Teachers other than the student: layer/head alignment, fusion of several, loading.

``align``: map a teacher of another shape onto the student's layers and the student's KV and
hidden states into the teacher's space. ``fusion``: weigh several teachers per latent slot.
``external``: load frozen teachers and compute their fused loss inside the objective.
"""
