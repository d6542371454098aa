// Compile-only stand-in for the Android/LiteRT/ExecuTorch API that the bundle's Kotlin uses.
package org.pytorch.executorch;
public abstract class Tensor {
  public static Tensor fromBlob(float[] data, long[] shape) { return null; }
  public float[] getDataAsFloatArray() { return null; }
}
