"""Does transfer learning pay? Pretrained against scratch over data sizes, with its figures."""
