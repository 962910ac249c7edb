"""One slide as the application sees it: the attention view and the patch view
(``views``), patches at an exact mpp (``resolution``), the tissue mask (``tissue``),
regions of interest (``roi``), content priors (``priors``), the level-0 box encoding
(``boxes``), input listing and slide names (``inputs``), the labels table
(``labels``) and what ``ats-wsi info`` reports (``metadata``)."""
