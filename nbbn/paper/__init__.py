"""``nbbn paper``: Ioffe & Szegedy (2015) §4.1 / Figure 1 on a NumPy MLP whose batch norms run on
nbbn -- data (:mod:`.data`), the network (:mod:`.network`), the experiment
(:mod:`.experiment`), the report (:mod:`.report`) and the command (:mod:`.commands`)."""
