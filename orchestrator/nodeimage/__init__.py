"""Node images: the recipe of `images/warewulf/`, built into an OCI image (`build`), exported
for Warewulf (`warewulf`) and as a bootable disk (`disk`), and published to the clouds."""
