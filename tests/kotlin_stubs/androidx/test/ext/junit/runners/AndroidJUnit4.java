// Compile-only stand-in for the Android/LiteRT/ExecuTorch API that the bundle's Kotlin uses.
package androidx.test.ext.junit.runners;
public class AndroidJUnit4 {}
