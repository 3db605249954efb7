"""One file per fused op: custom-op registration (fake + autograd) and the public function."""
