"""Research code: the learned FoB prompt generator, its training and its ablations.

Nothing on the product path (``Segmenter`` with its defaults, the Slicer module, ``fobsegment
segment``) imports this package.  The learned generator plugs into the pipeline as a start
prompter: ``Segmenter(backbone, start_prompter=GeneratorPrompter(backbone, weights))``.
"""
