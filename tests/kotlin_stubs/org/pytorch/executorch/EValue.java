// Compile-only stand-in for the Android/LiteRT/ExecuTorch API that the bundle's Kotlin uses.
package org.pytorch.executorch;
public class EValue {
  public static EValue from(Tensor tensor) { return null; }
  public Tensor toTensor() { return null; }
}
