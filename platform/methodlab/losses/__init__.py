"""Training losses as pure functions on tensors, one module per paper. Each cites the paper and the
official file it follows and states its shapes; none imports a method or the training loop."""
